"""The `aggregation` transform: mean, sum, min or max of each series over tumbling windows."""
