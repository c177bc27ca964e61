"""UCI Heart Disease as its natural federation of 4 hospitals (FLamby's Fed-Heart-Disease), logistic regression.

    fedloom simulate heart_disease                       # downloads the 4 files from UCI (checksummed)
    fedloom simulate heart_disease --data path/to/heart_disease

Each hospital (Cleveland, Hungary, Switzerland, VA Long Beach) is one client with its own 66/34 train/test
split and its own standardisation, exactly as FLamby preprocesses it. The model is a NumPy logistic
regression, so this job never imports torch.

The training budget is FLamby's: batch size 4, learning rate 0.001, 100 local SGD steps per round and 15
rounds (about as many examples as 50 epochs of pooled training). With it the mean over the 4 hospitals of the
per-hospital test accuracy is 0.736 (5 seeds; benchmarks/heart_disease.py, results in benchmarks/RESULTS.md).
Training much longer, or at lr 0.01, fits the training data more closely and settles near 0.71.
"""

import fedloom as fl
from fedloom.data import load_heart_disease

job = fl.Job(
    name="heart_disease",
    task=fl.LogisticRegressionTask(num_features=13, num_classes=2),
    data=load_heart_disease,
    strategy=fl.FedAvg(
        fraction=1.0, min_clients=4, fit=fl.FitConfig(local_epochs=None, local_steps=100, batch_size=4, lr=0.001)
    ),
    simulation=fl.SimulationConfig(num_clients=4, rounds=15, partition=fl.PartitionConfig(scheme="natural")),
)
