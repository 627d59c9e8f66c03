"""Writing and publishing a merge: the output folder (`export`), its model card (`card`) and plots
(`plot`, `watchplot`), and the push to the Hub (`push`)."""
