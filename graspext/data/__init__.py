from graspext.data.digits import digits_dataset

__all__ = ["digits_dataset"]
