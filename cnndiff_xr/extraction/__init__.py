"""The extraction half: image sources, model backends, the store writer, the cluster and the run that ties them."""
