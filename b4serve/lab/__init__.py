"""The lab: benchmarks, soak, the demo-model builder and throwaway test servers."""
