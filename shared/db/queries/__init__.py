"""Read models: the queries of the read-only tools (case view, ops search and explain,
the console's overview, what-if, calendar status), so no SQL lives outside shared/db.
They read; only the owners of each table write it."""
