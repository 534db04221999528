"""tasks layer of pkt (see DESIGN.md)."""
