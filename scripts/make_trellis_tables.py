#!/usr/bin/env python
"""Write ``moecompress/assets/trellis_tables.safetensors``: the trellis code's learned tables (`algorithms.trellis.
train_table`, seed 0) for 10-bit states at 2, 3 and 4 bits per weight. The quantizer reads them from there (a
fixed table for every machine; the packed checkpoint stores its own copy anyway)."""

from safetensors.torch import save_file

from moecompress.algorithms.trellis import STATE_BITS, TABLES, train_table

if __name__ == "__main__":
    save_file({f"L{STATE_BITS}_k{k}": train_table(STATE_BITS, k).contiguous() for k in (2, 3, 4)}, str(TABLES),
              metadata={"format": "moecompress-trellis-tables", "seed": "0"})
    print(TABLES)
