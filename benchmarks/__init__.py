"""Side-by-side timing of dnir against its peers (see README.md here)."""
