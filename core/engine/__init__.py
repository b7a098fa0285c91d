"""The execution engine: outbox, dispatcher, executor, retries, breakers, scheduler."""
