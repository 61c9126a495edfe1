"""What the supervisor and its workers share: frames, value types, config."""
