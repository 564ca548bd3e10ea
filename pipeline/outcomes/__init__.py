"""What the masks do: ``suppression`` (zeroing a task's neurons) and ``steering`` (learned scales)."""
