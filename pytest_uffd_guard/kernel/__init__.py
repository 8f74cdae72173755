"""Python faces of the kernel: capabilities, the fault handler, pagemap,
stack capture, memory and records.  No policy and no pytest here; the
engines (``..engines``) decide, this package only does."""
