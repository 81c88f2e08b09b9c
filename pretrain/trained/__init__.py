"""What you do with a trained model: load a run or a released checkpoint to generate (`loaded`), export a run
as a Hugging Face or PEFT directory (`export_run`)."""
