"""The networks and what they mean: the UNet (`nets`), EDM and bridge coefficients
(`schedules`, `bridge`), the two teachers (`teachers`), diffusers teachers (`pretrained`), and
checkpoints: the file format (`checkpoint`) and one loader per checkpoint kind (`loading`).
"""
