"""Feature dashboards: top-activating examples, density, histograms and logit effects."""
