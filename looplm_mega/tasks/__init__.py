"""Synthetic tasks of the Ouro paper (Mano), generated on the fly for small controlled studies."""
