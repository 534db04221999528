"""artifacts layer of pkt (see DESIGN.md)."""
