"""fxprune's passes, one per file: trace, shapes, dependency, importance, select, rewrite, verify, export."""
