"""flows layer of pkt (see DESIGN.md)."""
