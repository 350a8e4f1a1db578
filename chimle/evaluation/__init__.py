"""Evaluation: the papers' metrics (FID, KID, FwV, LPIPS diversity, PRD, IvO), `chimle eval`, and the
sample-efficiency curve of the search."""
