"""Scale-out: Ray Data screening of large datasets (`scale.ray_screen`); the vLLM engine lives in `inference`."""
