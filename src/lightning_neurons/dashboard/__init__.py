"""The Neurons dashboard: views of a run's history (queries) and the TensorBoard plugin that serves them."""
