"""The dashboard's table models: one QAbstractTableModel class per table."""
