-- An OpenID is short, but an authentic push may carry any FromUserName, and a B-tree
-- entry over about 2.7 KB cannot be stored: a hash index has no such limit and still
-- finds a follower's records (`wxgate forget`, user_authorization_revoke).
DROP INDEX pushes_from_user;
CREATE INDEX pushes_from_user ON pushes USING hash (from_user);
