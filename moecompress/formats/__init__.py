"""On-disk formats."""

from moecompress.formats.spec import FORMATS, FormatSpec

__all__ = ["FORMATS", "FormatSpec"]
