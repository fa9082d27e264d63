"""One module per CLI verb; see hgvae.cli."""
