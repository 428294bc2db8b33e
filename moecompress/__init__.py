"""moecompress: post-training compression for Hugging Face Mixture-of-Experts LLMs.

Importing the package registers the ``moecompress`` quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained`` loads packed checkpoints (weights stay packed in memory).
"""

from moecompress.nn.hf_quantizer import register as _register
from moecompress.version import __version__

__all__ = ["__version__"]

_register()
