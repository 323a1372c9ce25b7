"""Caption datasets: the embedded ``shapes`` data and loaders for public captioning corpora."""
