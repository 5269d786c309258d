"""Work on finished runs: reports and plots, transfer comparisons, studies,
SAELens export, latent inspection. No Ray of their own."""
