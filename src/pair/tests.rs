// model test: see below
