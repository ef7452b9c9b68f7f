"""What reads the job's output: the training cache and model, search, evaluation, pictures."""
