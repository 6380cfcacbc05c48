"""The comparison report and PNG figures."""
