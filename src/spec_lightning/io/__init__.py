"""Reading and writing outside the training loop: pretrained names and local folders
(:mod:`.pretrained`), checkpoint files, their integrity and atomic writes (:mod:`.checkpoints`), adapter
folders exported alone or merged (:mod:`.adapters`), where a run writes and what ``last`` resumes
(:mod:`.runs`), and the offline bundle for air-gapped nodes (:mod:`.bundle`)."""
