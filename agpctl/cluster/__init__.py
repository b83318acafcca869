"""Ray: connecting (embedded local instance or a remote cluster), what travels to the
cluster (code and environment), job submission, the one TorchTrainer factory, and the
event queue from workers and tasks to the driver.

Ray itself is imported inside the functions that need it: importing it costs seconds at
CLI start-up, and token authentication must be set up before Ray reads its configuration.
"""
