"""One module per task kind (generate, judge, train, eval). Not built yet: see issues 5 and 6."""
