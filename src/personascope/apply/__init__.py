"""Using a persona vector: monitor prompts and answers, measure a fine-tune's shift, screen data, guard training."""
