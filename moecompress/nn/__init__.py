"""Runtime modules: activation fake-quantization (and packed weights, later)."""
