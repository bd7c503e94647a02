"""Running the model over chats in length-sorted batches: generation, pooled activations, teacher-forced likelihood."""
