"""Several routers for one network (issue 17): routes shared through etcd, and links
between the routers that carry packets from one router's gateways to another's."""
