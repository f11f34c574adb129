"""Delta-net graph builders."""
