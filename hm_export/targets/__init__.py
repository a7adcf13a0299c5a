"""Emitters: one module per runtime, each turning the slot-split program into files in a bundle."""
