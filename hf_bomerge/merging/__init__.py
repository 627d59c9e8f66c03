"""The merge arithmetic: every merge is a weight vector over checkpoints (`weights`: the fixed rules;
`schedules`, `layers`: weights by progress and by depth), summed chunk by chunk (`engine`) into the live model for
a trial (`mergers`) or into the shards of the output (`writer`, `durable`)."""
