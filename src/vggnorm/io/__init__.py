"""Files and sources: checkpoints, weight formats and layouts, statistics files, images, labels, reports, models by arch."""
