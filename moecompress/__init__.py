"""moecompress: post-training compression for Hugging Face Mixture-of-Experts LLMs.

Importing the package registers the ``moecompress`` quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained`` loads packed checkpoints (weights stay packed in memory).
"""

from moecompress.nn.hf_quantizer import register as _register

__version__ = "0.1.0"
__all__ = ["__version__"]

_register()
