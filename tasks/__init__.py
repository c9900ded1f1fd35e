"""SeqIO task and mixture registrations of t5k (imported as `t5k_tasks`)."""
