"""Datasets: the registry, generated sets, .beton files and FFCV loaders."""
