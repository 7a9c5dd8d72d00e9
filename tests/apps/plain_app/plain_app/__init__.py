"""plain-app: a plain Flower app, the starting point of docs/migrate.md."""
