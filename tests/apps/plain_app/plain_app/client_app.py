"""ClientApp: local training and evaluation of the linear model."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from plain_app.task import load_data, loss, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    model = msg.content["arrays"].to_numpy_ndarrays()
    x, y = load_data(int(context.node_config["partition-id"]))
    new = train(dict(zip(("w", "b"), model)), x, y,
                steps=int(context.run_config["local-steps"]),
                lr=float(context.run_config["learning-rate"]))
    content = RecordDict({
        "arrays": ArrayRecord(list(new.values())),
        "metrics": MetricRecord({"train_loss": loss(new, x, y), "num-examples": len(x)}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    model = dict(zip(("w", "b"), msg.content["arrays"].to_numpy_ndarrays()))
    x, y = load_data(int(context.node_config["partition-id"]))
    content = RecordDict({
        "metrics": MetricRecord({"eval_loss": loss(model, x, y), "num-examples": len(x)}),
    })
    return Message(content=content, reply_to=msg)
