"""The experiment runner behind ``spec-lightning reproduce``: a grid's definition (:mod:`.grid`), the
learning-rate sweep that tunes it (:mod:`.sweep`), the CSV rows and curves a finished run leaves
(:mod:`.records`) and the loop that runs what is missing (:mod:`.reproduce`)."""
