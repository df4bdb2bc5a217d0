"""Photos in, ages out: faces found, cropped as the model's training data was, and estimated; no MLflow."""
