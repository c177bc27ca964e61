"""UCI Heart Disease as its natural federation of 4 hospitals (FLamby's Fed-Heart-Disease), logistic regression.

    fedloom simulate heart_disease                       # downloads the 4 files from UCI (checksummed)
    fedloom simulate heart_disease --data path/to/heart_disease

Each hospital (Cleveland, Hungary, Switzerland, VA Long Beach) is one client with its own 66/34 train/test
split and its own standardisation, exactly as FLamby preprocesses it. The model is a NumPy logistic
regression, so this job never imports torch.
"""

import fedloom as fl
from fedloom.data import load_heart_disease

job = fl.Job(
    name="heart_disease",
    task=fl.LogisticRegressionTask(num_features=13, num_classes=2),
    data=load_heart_disease,
    strategy=fl.FedAvg(
        fraction=1.0, min_clients=4, fit=fl.FitConfig(local_epochs=None, local_steps=100, batch_size=4, lr=0.01)
    ),
    simulation=fl.SimulationConfig(num_clients=4, rounds=20, partition=fl.PartitionConfig(scheme="natural")),
)
