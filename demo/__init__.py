"""``make demo``: the seed end to end on a throwaway node made of network namespaces."""
